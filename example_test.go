package sandbox_test

import (
	"context"
	"fmt"
	"os"

	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/image"
)

// A sandbox with the built-in userland (a shell and core commands).
func ExampleNew() {
	ctx := context.Background()
	sb, err := sandbox.New(ctx, sandbox.Name("job-42"), sandbox.Memory(256<<20))
	if err != nil {
		fmt.Fprintln(os.Stderr, err) // e.g. errors.Is(err, sandbox.ErrKVMUnusable)
		return
	}
	defer sb.Close()
	res, err := sb.Run(ctx, "sh", "-c", "echo hello from $(hostname)")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	fmt.Printf("%s", res.Stdout)
}

// A sandbox booted from an OCI image, with pull progress.
func ExampleImage() {
	ctx := context.Background()
	progress := image.WithProgress(func(p image.Progress) {
		fmt.Fprintf(os.Stderr, "%s %d/%d\n", p.Layer, p.Done, p.Total)
	})
	sb, err := sandbox.New(ctx, sandbox.Image("python:3.12-slim", progress))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	defer sb.Close()
	res, err := sb.Run(ctx, "python3", "-c", "print(6*7)")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	fmt.Printf("%s", res.Stdout)
}
