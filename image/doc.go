// Package image turns OCI images into what a gosandbox guest boots from.
package image
