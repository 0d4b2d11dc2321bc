"""What people look at: plots, attention heatmaps, comparison and study summaries."""
