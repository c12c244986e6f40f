"""Report: the terminal, JSON, JUnit XML, HTML and Markdown reports, history and compare."""
