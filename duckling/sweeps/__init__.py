"""Many runs: the sweep ``spec``, the Ray ``engine``, its ``progress`` board, ``compare`` across run
folders and the dead-token ``study``. The top of the pipeline below the CLI and notebooks."""
