"""In-pod traffic redirection (spec section 3): the iptables rules (`iptables`, pure), the ip
rule/route (`netlink`), and `redirector.Redirector`, which applies both to a pod netns, all or
nothing. IPv4 today; the rule builders take an address family so IPv6 can follow."""
