"""The benchmark (``python bench/run.py``): the gateway side by side with what users would run instead.

run.py is the command line; harness.py starts and stops the processes and tools every scenario stands on;
scenarios/ holds one module per scenario (what it measures, its JSON keys, its section of the report); report.py
turns the results into the JSON line, the Markdown tables, RESULTS.md and the charts. soak.py, ceiling.py and
sim_server.py are scripts of their own.
"""
