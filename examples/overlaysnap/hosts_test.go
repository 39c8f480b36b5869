package overlaysnap_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/examples/overlaysnap"
	"github.com/snapmeta/storage/internal/hostsuite"
)

// hostDriver describes overlaysnap to the host suite: hosts share one etcd
// root, in host scopes, and one data directory, and run containerd's
// metadata layer over the driver.
var hostDriver = hostsuite.Driver{
	New: func(root string, ms storage.MetaStore) (snapshots.Snapshotter, error) {
		return overlaysnap.New(root, ms)
	},
	Etcd:         sharedEtcd,
	Prefix:       uniquePrefix,
	RequireRoot:  requireRoot,
	WritableDir:  writableDir,
	ReadFile:     readTree,
	SnapshotDirs: snapshotDirNames,
}

// TestHosts runs the host suite: the remote-snapshot protocol through
// containerd's metadata layer on hosts sharing a root.
func TestHosts(t *testing.T) {
	hostsuite.Run(t, hostDriver)
}

// writableDir is where an active's writes land: the source of a bind
// mount, the upper directory of an overlay.
func writableDir(t testing.TB, mounts []mount.Mount) string {
	t.Helper()
	require.Len(t, mounts, 1)
	if mounts[0].Type == "bind" {
		return mounts[0].Source
	}
	require.Equal(t, "overlay", mounts[0].Type)
	for _, o := range mounts[0].Options {
		if d, ok := strings.CutPrefix(o, "upperdir="); ok {
			return d
		}
	}
	t.Fatalf("no upperdir in %v", mounts[0].Options)
	return ""
}

// readTree reads file in the tree the mounts show, without mounting: from
// the bind mount's source, or from the overlay's topmost layer that has it
// (the tests write no whiteouts).
func readTree(t testing.TB, mounts []mount.Mount, file string) string {
	t.Helper()
	require.Len(t, mounts, 1)
	var dirs []string
	if mounts[0].Type == "bind" {
		dirs = []string{mounts[0].Source}
	}
	for _, o := range mounts[0].Options {
		if d, ok := strings.CutPrefix(o, "upperdir="); ok {
			dirs = append([]string{d}, dirs...)
		}
		if l, ok := strings.CutPrefix(o, "lowerdir="); ok {
			dirs = append(dirs, strings.Split(l, ":")...)
		}
	}
	for _, d := range dirs {
		if b, err := os.ReadFile(filepath.Join(d, file)); err == nil {
			return string(b)
		}
	}
	t.Fatalf("%s is in none of %v", file, dirs)
	return ""
}

// snapshotDirNames lists <root>/snapshots: one directory a snapshot ID.
func snapshotDirNames(t testing.TB, root string) []string {
	t.Helper()
	return hostsuite.ListDir(t, filepath.Join(root, "snapshots"))
}

func TestHostScopedActivesRecordTheirUpperdir(t *testing.T) {
	requireRoot(t)
	a := hostsuite.Share(t, hostDriver).Host(t, "A")
	require.True(t, a.Unpack(t, hostsuite.Chain1, "", hostsuite.Layer1))
	mounts := a.Prepare(t, "container", hostsuite.Chain1)
	var active snapshots.Info
	for _, i := range a.Backend(t) {
		if i.Kind == snapshots.KindActive {
			active = i
		}
	}
	require.NotEmpty(t, active.Name)
	assert.Equal(t, writableDir(t, mounts), active.Labels[storage.KeyUpperdir])
	// Another host sees it where a takeover would look.
	var got storage.ActiveSnapshot
	require.NoError(t, a.MS.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
		got, err = storage.GetActiveSnapshot(ctx, "A", active.Name)
		return err
	}))
	assert.Equal(t, writableDir(t, mounts), got.Upperdir)
}

func TestCleanupOnASharedRootSparesOtherHostsDirectories(t *testing.T) {
	requireRoot(t)
	s := hostsuite.Share(t, hostDriver)
	a, b := s.Host(t, "A"), s.Host(t, "B")
	ctx := hostsuite.Ctx()
	require.True(t, b.Unpack(t, hostsuite.Chain1, "", hostsuite.Layer1))
	b.Prepare(t, "container-b", hostsuite.Chain1)
	// A directory of B's that is still being prepared.
	require.NoError(t, os.Mkdir(filepath.Join(s.Root, "snapshots", "new-of-B"), 0o700))
	before := s.Dirs(t)
	require.Len(t, before, 3)

	// A's scope has none of them; its Cleanup, and a collection of A's
	// garbage (which calls it), leave them all.
	cleaner, ok := a.SN.(snapshots.Cleaner)
	require.True(t, ok)
	require.NoError(t, cleaner.Cleanup(ctx))
	a.Prepare(t, "a-scratch", "")
	a.Drop(t, "a-scratch")
	assert.Equal(t, before, s.Dirs(t))
	assert.Empty(t, a.Backend(t))
}
