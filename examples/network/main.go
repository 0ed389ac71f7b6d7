// Command network shows a sandbox's network policy at work: a guest
// connection to a service on the host's loopback is refused by default
// and goes through once a rule allows it; a guest port is published on
// the host.
//
//	go run ./examples/network
//
// Like examples/hello it runs itself inside the emulated KVM host where
// this host's KVM cannot boot Linux.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/internal/examplehost"
	"github.com/gosandbox/sandbox/netstack"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "network:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	// A service on the host's loopback that counts what it receives.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer l.Close()
	got := make(chan int64, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			n, _ := io.Copy(io.Discard, c)
			c.Close()
			got <- n
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	target := fmt.Sprintf("%s:%d", netstack.HostAlias, port)

	for _, tc := range []struct {
		what  string
		rules []string
	}{
		{"default policy (public internet only)", nil},
		{fmt.Sprintf("with allow@host:tcp:%d", port), []string{fmt.Sprintf("allow@host:tcp:%d", port)}},
	} {
		sb, err := examplehost.New(ctx, sandbox.Name("network-demo"), sandbox.Memory(256<<20), sandbox.NetworkRules(tc.rules...))
		if err != nil {
			return err
		}
		res, err := sb.Run(ctx, "tcpblast", "send", target, "1M")
		sb.Close()
		if err != nil {
			return err
		}
		fmt.Printf("%s: guest `tcpblast send %s 1M` exit %d %s%s", tc.what, target, res.ExitCode, res.Stdout, res.Stderr)
		select {
		case n := <-got:
			fmt.Printf("  the host service received %d bytes\n", n)
		case <-time.After(2 * time.Second):
			fmt.Println("  the host service received nothing")
		}
	}
	return nil
}
