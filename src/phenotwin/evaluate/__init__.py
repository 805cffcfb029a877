"""Measuring translations and models: classifier flip rate, heatmap AUROC, preservation."""
