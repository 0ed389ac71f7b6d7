//go:build !linux

package netcfg

import "errors"

// ErrUnsupported is returned by Apply outside Linux.
var ErrUnsupported = errors.New("netcfg: network configuration needs Linux")

// Apply validates cfg and returns ErrUnsupported: the guest is Linux.
func Apply(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	return ErrUnsupported
}
