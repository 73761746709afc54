"""The mesh CA service: signs workload certificates for node proxies it has authenticated
(node tokens), for identities of pods scheduled on the calling node (spec section 5.4)."""
