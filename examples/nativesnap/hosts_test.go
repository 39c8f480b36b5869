package nativesnap_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage/examples/nativesnap"
	"github.com/snapmeta/storage/internal/hostsuite"
)

// hostDriver describes nativesnap to the host suite: hosts share one etcd
// root, in host scopes, and one data directory, and run containerd's
// metadata layer over the driver.
var hostDriver = hostsuite.Driver{
	New:         nativesnap.New,
	Etcd:        sharedEtcd,
	Prefix:      uniquePrefix,
	RequireRoot: requireRoot,
	WritableDir: writableDir,
	// The bind mount's source holds the whole tree.
	ReadFile: func(t testing.TB, mounts []mount.Mount, file string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(writableDir(t, mounts), file))
		require.NoError(t, err)
		return string(b)
	},
	SnapshotDirs: func(t testing.TB, root string) []string {
		return hostsuite.ListDir(t, filepath.Join(root, "snapshots"))
	},
}

// writableDir is where an active's writes land: the bind mount's source.
func writableDir(t testing.TB, mounts []mount.Mount) string {
	t.Helper()
	require.Len(t, mounts, 1)
	require.Equal(t, "bind", mounts[0].Type)
	return mounts[0].Source
}

// TestHosts runs the host suite: the remote-snapshot protocol through
// containerd's metadata layer on hosts sharing a root.
func TestHosts(t *testing.T) {
	hostsuite.Run(t, hostDriver)
}
