"""Transfer-learning library: frozen VGG19 features (cached), softmax head, fine-tune, model store."""
