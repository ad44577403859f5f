"""Patient inputs as the model and the rules see them: a lab frame and note texts."""
