"""What a run writes for people to read: result tables and their files (`tables`), the one
heatmap renderer (`render`), the prediction writer (`writers`), and the TensorBoard event files
and curves beside the training log (`summaries`)."""
