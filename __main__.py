from chmc.cli import main

main()
