import sys

from bench.sqs.run import main

sys.exit(main())
