"""What operators watch: Prometheus metrics (`metrics`)."""
