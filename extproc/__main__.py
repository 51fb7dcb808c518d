from extproc.commands.cli import main

raise SystemExit(main())
