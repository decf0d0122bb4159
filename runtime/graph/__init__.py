"""Agent graphs: declaration and validation, priorities over the graph, runs and their events."""
