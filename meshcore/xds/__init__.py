"""Delta xDS: resource type URLs, model <-> protobuf conversion, and the client."""
