package userland

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// tcpblastChunk is the size of each write of tcpblast send.
const tcpblastChunk = 256 << 10

// tcpblast measures TCP from inside the guest, for benchmarks that compare
// network paths (it is in the default userland so that it needs no image):
//
//	tcpblast send HOST:PORT BYTES   connect, write BYTES zeros, close
//	tcpblast recv HOST:PORT         connect, read to end of file
//	tcpblast connect HOST:PORT N    N sequential connects and closes
//
// Each prints one line: "<bytes or count> <seconds>". The host side of a
// benchmark should measure too; this is the guest's view.
func tcpblast(ctx context.Context, stdio IO, args []string) int {
	const usage = "usage: tcpblast send HOST:PORT BYTES | recv HOST:PORT | connect HOST:PORT N"
	if len(args) < 2 {
		return fail(stdio, "tcpblast", usage)
	}
	mode, addr := args[0], args[1]
	var d net.Dialer
	switch {
	case mode == "send" && len(args) == 3:
		n, err := parseSize(args[2])
		if err != nil {
			return fail(stdio, "tcpblast", "%v", err)
		}
		start := time.Now()
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return fail(stdio, "tcpblast", "%v", err)
		}
		buf := make([]byte, tcpblastChunk)
		var sent int64
		for sent < n && err == nil {
			chunk := buf
			if n-sent < int64(len(chunk)) {
				chunk = chunk[:n-sent]
			}
			var w int
			w, err = c.Write(chunk)
			sent += int64(w)
		}
		if cerr := c.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fail(stdio, "tcpblast", "send after %d bytes: %v", sent, err)
		}
		fmt.Fprintf(stdio.Stdout, "%d %.6f\n", sent, time.Since(start).Seconds())
	case mode == "recv" && len(args) == 2:
		start := time.Now()
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return fail(stdio, "tcpblast", "%v", err)
		}
		n, err := io.CopyBuffer(io.Discard, c, make([]byte, tcpblastChunk))
		c.Close()
		if err != nil {
			return fail(stdio, "tcpblast", "recv after %d bytes: %v", n, err)
		}
		fmt.Fprintf(stdio.Stdout, "%d %.6f\n", n, time.Since(start).Seconds())
	case mode == "connect" && len(args) == 3:
		n, err := strconv.Atoi(args[2])
		if err != nil || n < 0 {
			return fail(stdio, "tcpblast", "invalid count %q", args[2])
		}
		start := time.Now()
		for i := 0; i < n; i++ {
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return fail(stdio, "tcpblast", "connect %d: %v", i, err)
			}
			c.Close()
		}
		fmt.Fprintf(stdio.Stdout, "%d %.6f\n", n, time.Since(start).Seconds())
	default:
		return fail(stdio, "tcpblast", usage)
	}
	return 0
}
