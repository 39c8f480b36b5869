package hostsuite

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// unpackImage unpacks the image of the scenarios on h: Chain1 with Layer1,
// and Chain2 with Layer2 on it.
func unpackImage(t *testing.T, h *Host) {
	t.Helper()
	require.True(t, h.Unpack(t, Chain1, "", Layer1), "host %s unpacks layer 1", h.Name)
	require.True(t, h.Unpack(t, Chain2, Chain1, Layer2), "host %s unpacks layer 2", h.Name)
}

// bindImage unpacks the image of the scenarios on h where another host
// has it: Prepare says AlreadyExists and containerd's metadata layer finds
// the target by its label, so that nothing is unpacked.
func bindImage(t *testing.T, h *Host) {
	t.Helper()
	require.False(t, h.Unpack(t, Chain1, "", nil), "%s unpacked layer 1 again", h.Name)
	require.False(t, h.Unpack(t, Chain2, Chain1, nil), "%s unpacked layer 2 again", h.Name)
}

func testBindsInsteadOfUnpacking(t *testing.T, d Driver) {
	s := Share(t, d)
	a, b := s.Host(t, "A"), s.Host(t, "B")
	unpackImage(t, a)
	dirsAfterA := s.Dirs(t)

	// B's unpack of the same layers binds A's.
	bindImage(t, b)
	assert.Equal(t, dirsAfterA, s.Dirs(t), "B made no directory")

	info, err := b.Meta.Stat(Ctx(), Chain2)
	require.NoError(t, err)
	assert.Equal(t, snapshots.KindCommitted, info.Kind)
	assert.Equal(t, Chain1, info.Parent)
	// Each of B's backend snapshots is a binding named by the Prepare's
	// key, labelled with the target, on the binding of the parent.
	bb, ab := b.Backend(t), a.Backend(t)
	require.Len(t, bb, 2, "B's backend: %v", bb)
	for name, i := range bb {
		assert.Contains(t, name, "extract-B ", "binding %s is named by B's Prepare key", name)
		assert.Equal(t, snapshots.KindCommitted, i.Kind)
		target := i.Labels[snapshots.LabelSnapshotRef]
		switch target {
		case Chain1:
			assert.Empty(t, i.Parent)
		case Chain2:
			assert.Equal(t, Chain1, bb[i.Parent].Labels[snapshots.LabelSnapshotRef], "the parent is B's binding of layer 1")
		default:
			t.Errorf("binding %s has target %q", name, target)
		}
	}
	require.Len(t, ab, 2)

	// A container on B sees both layers, in A's directories (as a copy of
	// them, or as its lower directories: the driver's choice).
	mounts := b.Prepare(t, "container-b", Chain2)
	assert.Equal(t, "layer 1\n", d.ReadFile(t, mounts, "etc/one"))
	assert.Equal(t, "layer 2\n", d.ReadFile(t, mounts, "etc/two"))
	RequireCheckClean(t, a.MS)
}

func testRemoveKeepsBoundLayer(t *testing.T, d Driver) {
	s := Share(t, d)
	a, b := s.Host(t, "A"), s.Host(t, "B")
	unpackImage(t, a)
	bindImage(t, b)
	mounts := b.Prepare(t, "container-b", Chain2)
	withContainer := s.Dirs(t)
	require.Len(t, withContainer, 3)

	// A drops the image; its garbage collector removes A's snapshots from
	// the driver, which releases them: B's bindings keep the data.
	a.Drop(t, Chain2, Chain1)
	assert.Empty(t, a.Backend(t), "A's scope after its collection")
	assert.Equal(t, withContainer, s.Dirs(t), "A's collection deleted no directory")
	assert.Equal(t, "layer 2\n", d.ReadFile(t, mounts, "etc/two"))
	// B goes on: a new container from the image.
	mounts2 := b.Prepare(t, "container-b2", Chain2)
	assert.Equal(t, "layer 1\n", d.ReadFile(t, mounts2, "etc/one"))
	RequireCheckClean(t, a.MS)
	// A wants the image again: it binds the layers it made, which B kept.
	bindImage(t, a)
	require.Len(t, s.Dirs(t), 4)

	// B drops everything: A's bindings keep the layers.
	b.Drop(t, "container-b2", "container-b", Chain2, Chain1)
	assert.Empty(t, b.Backend(t))
	assert.Len(t, s.Dirs(t), 2, "the layers A binds are left")
	RequireCheckClean(t, b.MS)

	// A drops them too: the last bindings go, and the data with them.
	a.Drop(t, Chain2, Chain1)
	assert.Empty(t, a.Backend(t))
	assert.Empty(t, s.Dirs(t), "every directory is gone")
	RequireCheckClean(t, a.MS)
}

func testCollidingNames(t *testing.T, d Driver) {
	s := Share(t, d)
	hosts := s.Hosts(t, "A", "B")
	a, b := hosts[0], hosts[1]
	// Identical steps on both hosts: containerd's counters give the same
	// backend names in both scopes.
	for _, h := range hosts {
		h.Prepare(t, "c", "")
	}
	an, bn := a.Backend(t), b.Backend(t)
	require.Len(t, an, 1)
	for name := range an {
		require.Contains(t, bn, name, "the same backend name in both scopes")
	}
	require.True(t, a.Unpack(t, Chain1, "", Layer1))
	require.False(t, b.Unpack(t, Chain1, "", nil))
	for _, h := range hosts {
		mounts := h.Prepare(t, "d", Chain1)
		assert.Equal(t, "layer 1\n", d.ReadFile(t, mounts, "etc/one"), "host %s", h.Name)
	}
	RequireCheckClean(t, a.MS)
	for _, h := range hosts {
		h.Drop(t, "d", "c", Chain1)
	}
	assert.Empty(t, s.Dirs(t))
	RequireCheckClean(t, a.MS)
}

func testRefLabelWithoutHostScopes(t *testing.T, d Driver) {
	root := t.TempDir()
	ms, err := storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
	require.NoError(t, err)
	sn, err := d.New(root, ms)
	require.NoError(t, err)
	defer sn.Close()
	ctx := context.Background()
	_, err = sn.Prepare(ctx, "a", "", RefLabel(Chain1))
	require.NoError(t, err)
	require.NoError(t, sn.Commit(ctx, Chain1, "a", RefLabel(Chain1)))
	// The same layer again: unpacked, not bound.
	_, err = sn.Prepare(ctx, "b", "", RefLabel(Chain1))
	assert.NoError(t, err)
	require.NoError(t, sn.Remove(ctx, "b"))
	require.NoError(t, sn.Remove(ctx, Chain1))
	assert.Empty(t, d.SnapshotDirs(t, root))
}

func testUnpackingAtOnce(t *testing.T, d Driver) {
	s := Share(t, d)
	hosts := s.Hosts(t, "A", "B", "C")
	a, c := hosts[0], hosts[2]
	ctx := Ctx()
	// A and B both prepare before either commits: both unpack.
	for _, h := range hosts[:2] {
		mounts, err := h.Meta.Prepare(ctx, h.extractKey(Chain1), "", RefLabel(Chain1))
		require.NoError(t, err, "host %s", h.Name)
		require.NoError(t, os.WriteFile(filepath.Join(d.WritableDir(t, mounts), "f"), []byte(h.Name), 0o644))
	}
	for _, h := range hosts[:2] {
		require.NoError(t, h.Meta.Commit(ctx, Chain1, h.extractKey(Chain1), RefLabel(Chain1)))
	}
	require.Len(t, s.Dirs(t), 2)
	RequireCheckClean(t, a.MS)
	// C binds one of them.
	require.False(t, c.Unpack(t, Chain1, "", nil))
	mounts := c.Prepare(t, "container-c", Chain1)
	assert.Equal(t, "A", d.ReadFile(t, mounts, "f"), "C binds the layer with the lowest ID: A reserved its IDs first")
	RequireCheckClean(t, a.MS)
	for _, h := range hosts {
		if h == c {
			h.Drop(t, "container-c", Chain1)
		} else {
			h.Drop(t, Chain1)
		}
	}
	assert.Empty(t, s.Dirs(t))
	RequireCheckClean(t, a.MS)
}
