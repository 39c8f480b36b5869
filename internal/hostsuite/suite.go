// Package hostsuite is the shared suite of the reference drivers' host
// tests, as testsuite is the shared conformance suite of engines: it runs
// containerd's metadata layer (core/metadata, the layer between
// containerd's clients and a snapshotter, with its own bbolt meta.db)
// in-process, over a driver, once per host: two or three hosts share one
// etcd root, in host scopes (storage.WithHost), and one data directory.
// Layers are unpacked as containerd's unpacker does it: Prepare and Commit
// labelled containerd.io/snapshot.ref with the layer's chain ID. The
// scenarios check the remote-snapshot protocol of remote.go and share.go
// as a driver exposes it.
//
// A driver's test describes itself in a Driver and calls Run once:
//
//	func TestHosts(t *testing.T) { hostsuite.Run(t, hostDriver) }
//
// Its own host scenarios use Share, Host and the helpers of this package.
package hostsuite

import (
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// Driver is what differs from one driver to another.
type Driver struct {
	// New opens the driver on the data directory root over ms; the driver
	// owns ms from then on (it closes it on Close).
	New func(root string, ms storage.MetaStore) (snapshots.Snapshotter, error)
	// Etcd returns the test binary's shared etcd (the binary's TestMain
	// closes it), and Prefix a key prefix on it no other test uses.
	Etcd   func() (*etcdtest.Cluster, error)
	Prefix func() string
	// RequireRoot skips t where the driver cannot mount.
	RequireRoot func(t *testing.T)
	// WritableDir is where the writes of an active with these mounts land.
	WritableDir func(t testing.TB, mounts []mount.Mount) string
	// ReadFile reads file in the tree the mounts show, without mounting.
	ReadFile func(t testing.TB, mounts []mount.Mount, file string) string
	// SnapshotDirs lists the directories under the data directory root
	// that snapshot IDs own (and those being made for one).
	SnapshotDirs func(t testing.TB, root string) []string
}

// scenario is one subtest of Run.
type scenario struct {
	name string
	run  func(t *testing.T, d Driver)
}

// scenarios lists every subtest of Run, in the order they run; the names
// are those of the tests each driver had before the suite.
var scenarios = []scenario{
	{"HostBindsAnotherHostsLayersInsteadOfUnpacking", testBindsInsteadOfUnpacking},
	{"RemoveKeepsALayerAnotherHostBinds", testRemoveKeepsBoundLayer},
	{"HostsWithCollidingNamesShareLayers", testCollidingNames},
	{"RefLabelWithoutHostScopesIsAnOrdinaryLabel", testRefLabelWithoutHostScopes},
	{"HostsUnpackingOneLayerAtOnceBothCommitAndOthersBindOne", testUnpackingAtOnce},
}

// Run runs every scenario of the suite on d, as subtests of t. Each
// scenario skips where d.RequireRoot does, and starts its hosts on a data
// directory and an etcd root of its own.
func Run(t *testing.T, d Driver) {
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			d.RequireRoot(t)
			sc.run(t, d)
		})
	}
}
