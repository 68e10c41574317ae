"""What the model files and the runtime share: the model's rates and limits, the motion statistics,
safe checkpoint reading and oneDNN packed linears."""
