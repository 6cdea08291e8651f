"""What a run looks like: the HTML report with its plots, and the one-line sparkline ``status`` shows."""
