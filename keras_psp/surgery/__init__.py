"""Model surgery: channel groups of a functional graph, and the slim rebuild."""
