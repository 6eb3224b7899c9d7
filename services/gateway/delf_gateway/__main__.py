from delf_gateway.server import main

main()
