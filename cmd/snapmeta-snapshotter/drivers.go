package main

import (
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/examples/nativesnap"
	"github.com/snapmeta/storage/examples/overlaysnap"
)

// newDriver makes a snapshotter that keeps its files under root and its
// metadata in ms. On success the snapshotter owns ms (its Close closes ms);
// on failure ms is left open for the caller. Every driver of this module
// has this shape (nativesnap.New).
type newDriver func(root string, ms storage.MetaStore) (snapshots.Snapshotter, error)

// drivers are the choices of --driver. A driver with New(root, ms) is one
// line here.
var drivers = map[string]newDriver{
	"native": nativesnap.New,
	"overlay": func(root string, ms storage.MetaStore) (snapshots.Snapshotter, error) {
		return overlaysnap.New(root, ms)
	},
}

// driverNames lists the drivers in order, for help and errors.
func driverNames() string {
	names := make([]string, 0, len(drivers))
	for n := range drivers {
		names = append(names, n)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}
