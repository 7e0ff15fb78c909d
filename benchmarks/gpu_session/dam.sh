#!/usr/bin/env bash
exec python3 -c 'import sys; from dam_cli.cli.app import main; sys.argv[0] = "dam"; main()' "$@"
