from clipspm.cli import main

main()
