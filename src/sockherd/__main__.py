from sockherd.cli_fast import main

raise SystemExit(main())
