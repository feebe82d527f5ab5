"""`duoserve bench`, the load generator: request targets, the load generator, statistics and
reports. Installed with the gateway's `bench` extra (``pip install 'duoserve[bench]'``), which
brings its HTTP client (aiohttp) and plots (matplotlib); the gateway itself needs neither."""
