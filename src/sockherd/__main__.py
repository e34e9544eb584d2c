from sockherd.cli import main

raise SystemExit(main())
