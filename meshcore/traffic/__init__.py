"""L7 traffic rules (VirtualService, DestinationRule) as frozen values, and the request matching
a waypoint does with them. Sans-I/O."""
