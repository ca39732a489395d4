from metalab.cli import main

raise SystemExit(main())
