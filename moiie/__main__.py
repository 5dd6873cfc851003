from moiie.cli import main

raise SystemExit(main())
