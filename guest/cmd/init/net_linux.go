package main

import (
	"errors"

	"github.com/gosandbox/sandbox/guest/agentproto"
)

// setupNet configures the network interface the host described.
func setupNet(nc *agentproto.NetConfig, hostname string) error {
	return errors.New("this guest build cannot configure a network interface")
}
