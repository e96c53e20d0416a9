"""`python -m qkv ...` (and `torchrun ... -m qkv train ...`): the `qkv` command."""

from qkv.cli.main import main

raise SystemExit(main())
