from ctrlora_cli.app import main

main()
