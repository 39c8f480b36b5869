package overlaysnap_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/examples/overlaysnap"
)

// The tests of this file run containerd's metadata layer (core/metadata,
// the layer between containerd's clients and a snapshotter, with its own
// bbolt meta.db) in-process, over the driver, once per host: two hosts
// share one etcd root, in two host scopes, and one data directory. Layers
// are unpacked as containerd's unpacker does it: Prepare and Commit
// labelled containerd.io/snapshot.ref with the layer's chain ID.

// metaSnapshotter is the proxy plugin's name in the metadata layer.
const metaSnapshotter = "snapmeta"

// host is one containerd host: its driver on its scope of the shared root,
// and containerd's metadata layer over it.
type host struct {
	name string
	sn   snapshots.Snapshotter // the driver
	db   *metadata.DB
	meta snapshots.Snapshotter // containerd's view of the driver
	ms   storage.MetaStore     // the driver's store (the driver owns it)
}

// newHost starts host name on the etcd root etcdRoot and the data
// directory root.
func newHost(t *testing.T, name, etcdRoot, root string) *host {
	t.Helper()
	c, err := sharedEtcd()
	require.NoError(t, err)
	cfg := c.ClientConfig()
	ms, err := storage.NewEtcdStore(etcdRoot, &cfg, storage.WithHost(name))
	require.NoError(t, err)
	sn, err := overlaysnap.New(root, ms)
	if err != nil {
		ms.Close()
	}
	require.NoError(t, err)
	t.Cleanup(func() { sn.Close() })
	dir := t.TempDir()
	bdb, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, nil)
	require.NoError(t, err)
	t.Cleanup(func() { bdb.Close() })
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	require.NoError(t, err)
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{metaSnapshotter: sn})
	require.NoError(t, db.Init(context.Background()))
	return &host{name: name, sn: sn, db: db, meta: db.Snapshotter(metaSnapshotter), ms: ms}
}

// nsCtx is the containerd namespace of the tests.
func nsCtx() context.Context {
	return namespaces.WithNamespace(context.Background(), "test")
}

func refLabel(chainID string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: chainID})
}

// unpack applies one layer as containerd's unpacker does: Prepare
// labelled with the chain ID, files written into the mount, Commit under
// the chain ID with the same label. It reports whether the layer was
// unpacked (false: the snapshotter had it, AlreadyExists).
func unpack(t *testing.T, h *host, chainID, parent string, files map[string]string) bool {
	t.Helper()
	ctx := nsCtx()
	key := "extract-" + h.name + " " + chainID
	mounts, err := h.meta.Prepare(ctx, key, parent, refLabel(chainID))
	if errdefs.IsAlreadyExists(err) {
		return false
	}
	require.NoError(t, err)
	dir := writableDir(t, mounts)
	for name, body := range files {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644))
	}
	require.NoError(t, h.meta.Commit(ctx, chainID, key, refLabel(chainID)))
	return true
}

// writableDir is where an active's writes land: the source of a bind
// mount, the upper directory of an overlay.
func writableDir(t *testing.T, mounts []mount.Mount) string {
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
func readTree(t *testing.T, mounts []mount.Mount, file string) string {
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

// snapshotDirNames lists <root>/snapshots.
func snapshotDirNames(t *testing.T, root string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// backend returns the driver's snapshots of h: name to info.
func backend(t *testing.T, h *host) map[string]snapshots.Info {
	t.Helper()
	infos := map[string]snapshots.Info{}
	require.NoError(t, h.sn.Walk(context.Background(), func(_ context.Context, i snapshots.Info) error {
		infos[i.Name] = i
		return nil
	}))
	return infos
}

func requireCheckClean(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Empty(t, problems, "storage.Check")
}

const (
	chain1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	chain2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

func TestHostBindsAnotherHostsLayersInsteadOfUnpacking(t *testing.T) {
	requireRoot(t)
	root, etcdRoot := t.TempDir(), uniquePrefix()
	a := newHost(t, "A", etcdRoot, root)
	b := newHost(t, "B", etcdRoot, root)
	ctx := nsCtx()

	require.True(t, unpack(t, a, chain1, "", map[string]string{"etc/one": "layer 1\n"}))
	require.True(t, unpack(t, a, chain2, chain1, map[string]string{"etc/two": "layer 2\n"}))
	dirsAfterA := snapshotDirNames(t, root)

	// B's unpack of the same layers binds A's: Prepare says AlreadyExists
	// and containerd's metadata layer finds the target by its label.
	assert.False(t, unpack(t, b, chain1, "", nil), "B unpacked layer 1 again")
	assert.False(t, unpack(t, b, chain2, chain1, nil), "B unpacked layer 2 again")
	assert.Equal(t, dirsAfterA, snapshotDirNames(t, root), "B made no directory")

	info, err := b.meta.Stat(ctx, chain2)
	require.NoError(t, err)
	assert.Equal(t, snapshots.KindCommitted, info.Kind)
	assert.Equal(t, chain1, info.Parent)
	// Each of B's backend snapshots is a binding named by the Prepare's
	// key, labelled with the target, on the binding of the parent.
	bb, ab := backend(t, b), backend(t, a)
	require.Len(t, bb, 2, "B's backend: %v", bb)
	for name, i := range bb {
		assert.Contains(t, name, "extract-B ", "binding %s is named by B's Prepare key", name)
		assert.Equal(t, snapshots.KindCommitted, i.Kind)
		target := i.Labels[snapshots.LabelSnapshotRef]
		switch target {
		case chain1:
			assert.Empty(t, i.Parent)
		case chain2:
			assert.Equal(t, chain1, bb[i.Parent].Labels[snapshots.LabelSnapshotRef], "the parent is B's binding of layer 1")
		default:
			t.Errorf("binding %s has target %q", name, target)
		}
	}
	require.Len(t, ab, 2)

	// A container on B sees both layers: A's directories are its lower
	// directories.
	mounts, err := b.meta.Prepare(ctx, "container-b", chain2)
	require.NoError(t, err)
	assert.Equal(t, "layer 1\n", readTree(t, mounts, "etc/one"))
	assert.Equal(t, "layer 2\n", readTree(t, mounts, "etc/two"))
	requireCheckClean(t, a.ms)
}

func TestRemoveKeepsALayerAnotherHostBinds(t *testing.T) {
	requireRoot(t)
	root, etcdRoot := t.TempDir(), uniquePrefix()
	a := newHost(t, "A", etcdRoot, root)
	b := newHost(t, "B", etcdRoot, root)
	ctx := nsCtx()
	require.True(t, unpack(t, a, chain1, "", map[string]string{"etc/one": "layer 1\n"}))
	require.True(t, unpack(t, a, chain2, chain1, map[string]string{"etc/two": "layer 2\n"}))
	require.False(t, unpack(t, b, chain1, "", nil))
	require.False(t, unpack(t, b, chain2, chain1, nil))
	mounts, err := b.meta.Prepare(ctx, "container-b", chain2)
	require.NoError(t, err)
	withContainer := snapshotDirNames(t, root)
	require.Len(t, withContainer, 3)

	// A drops the image; its garbage collector removes A's snapshots from
	// the driver, which releases them: B's bindings keep the data.
	require.NoError(t, a.meta.Remove(ctx, chain2))
	require.NoError(t, a.meta.Remove(ctx, chain1))
	_, err = a.db.GarbageCollect(ctx)
	require.NoError(t, err)
	assert.Empty(t, backend(t, a), "A's scope after its collection")
	assert.Equal(t, withContainer, snapshotDirNames(t, root), "A's collection deleted no directory")
	assert.Equal(t, "layer 2\n", readTree(t, mounts, "etc/two"))
	// B goes on: a new container from the image.
	mounts2, err := b.meta.Prepare(ctx, "container-b2", chain2)
	require.NoError(t, err)
	assert.Equal(t, "layer 1\n", readTree(t, mounts2, "etc/one"))
	requireCheckClean(t, a.ms)
	// A wants the image again: it binds the layers it made, which B kept.
	assert.False(t, unpack(t, a, chain1, "", nil), "A unpacked layer 1 again")
	assert.False(t, unpack(t, a, chain2, chain1, nil), "A unpacked layer 2 again")
	withContainer2 := snapshotDirNames(t, root)
	require.Len(t, withContainer2, 4)

	// B drops everything: A's bindings keep the layers.
	for _, k := range []string{"container-b2", "container-b", chain2, chain1} {
		require.NoError(t, b.meta.Remove(ctx, k))
	}
	_, err = b.db.GarbageCollect(ctx)
	require.NoError(t, err)
	assert.Empty(t, backend(t, b))
	assert.Len(t, snapshotDirNames(t, root), 2, "the layers A binds are left")
	requireCheckClean(t, b.ms)

	// A drops them too: the last bindings go, and the data with them.
	require.NoError(t, a.meta.Remove(ctx, chain2))
	require.NoError(t, a.meta.Remove(ctx, chain1))
	_, err = a.db.GarbageCollect(ctx)
	require.NoError(t, err)
	assert.Empty(t, backend(t, a))
	assert.Empty(t, snapshotDirNames(t, root), "every directory is gone")
	requireCheckClean(t, a.ms)
}

func TestHostsWithCollidingNamesShareLayers(t *testing.T) {
	requireRoot(t)
	root, etcdRoot := t.TempDir(), uniquePrefix()
	a := newHost(t, "A", etcdRoot, root)
	b := newHost(t, "B", etcdRoot, root)
	ctx := nsCtx()
	// Identical steps on both hosts: containerd's counters give the same
	// backend names in both scopes.
	for _, h := range []*host{a, b} {
		_, err := h.meta.Prepare(ctx, "c", "")
		require.NoError(t, err)
	}
	an, bn := backend(t, a), backend(t, b)
	require.Len(t, an, 1)
	for name := range an {
		require.Contains(t, bn, name, "the same backend name in both scopes")
	}
	require.True(t, unpack(t, a, chain1, "", map[string]string{"etc/one": "layer 1\n"}))
	require.False(t, unpack(t, b, chain1, "", nil))
	for _, h := range []*host{a, b} {
		mounts, err := h.meta.Prepare(ctx, "d", chain1)
		require.NoError(t, err)
		assert.Equal(t, "layer 1\n", readTree(t, mounts, "etc/one"), "host %s", h.name)
	}
	requireCheckClean(t, a.ms)
	for _, h := range []*host{a, b} {
		for _, k := range []string{"d", "c", chain1} {
			require.NoError(t, h.meta.Remove(ctx, k))
		}
		_, err := h.db.GarbageCollect(ctx)
		require.NoError(t, err)
	}
	assert.Empty(t, snapshotDirNames(t, root))
	requireCheckClean(t, a.ms)
}

func TestRefLabelWithoutHostScopesIsAnOrdinaryLabel(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	ms, err := openBolt(root)
	require.NoError(t, err)
	sn, err := overlaysnap.New(root, ms)
	require.NoError(t, err)
	defer sn.Close()
	ctx := context.Background()
	_, err = sn.Prepare(ctx, "a", "", refLabel(chain1))
	require.NoError(t, err)
	require.NoError(t, sn.Commit(ctx, chain1, "a", refLabel(chain1)))
	// The same layer again: unpacked, not bound.
	_, err = sn.Prepare(ctx, "b", "", refLabel(chain1))
	assert.NoError(t, err)
	require.NoError(t, sn.Remove(ctx, "b"))
	require.NoError(t, sn.Remove(ctx, chain1))
	assert.Empty(t, snapshotDirNames(t, root))
}

func TestHostScopedActivesRecordTheirUpperdir(t *testing.T) {
	requireRoot(t)
	root, etcdRoot := t.TempDir(), uniquePrefix()
	a := newHost(t, "A", etcdRoot, root)
	ctx := nsCtx()
	require.True(t, unpack(t, a, chain1, "", map[string]string{"etc/one": "layer 1\n"}))
	mounts, err := a.meta.Prepare(ctx, "container", chain1)
	require.NoError(t, err)
	var active snapshots.Info
	for _, i := range backend(t, a) {
		if i.Kind == snapshots.KindActive {
			active = i
		}
	}
	require.NotEmpty(t, active.Name)
	assert.Equal(t, writableDir(t, mounts), active.Labels[storage.KeyUpperdir])
	// Another host sees it where a takeover would look.
	var got storage.ActiveSnapshot
	require.NoError(t, a.ms.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
		got, err = storage.GetActiveSnapshot(ctx, "A", active.Name)
		return err
	}))
	assert.Equal(t, writableDir(t, mounts), got.Upperdir)
}

func TestCleanupOnASharedRootSparesOtherHostsDirectories(t *testing.T) {
	requireRoot(t)
	root, etcdRoot := t.TempDir(), uniquePrefix()
	a := newHost(t, "A", etcdRoot, root)
	b := newHost(t, "B", etcdRoot, root)
	ctx := nsCtx()
	require.True(t, unpack(t, b, chain1, "", map[string]string{"etc/one": "layer 1\n"}))
	_, err := b.meta.Prepare(ctx, "container-b", chain1)
	require.NoError(t, err)
	// A directory of B's that is still being prepared.
	require.NoError(t, os.Mkdir(filepath.Join(root, "snapshots", "new-of-B"), 0o700))
	before := snapshotDirNames(t, root)
	require.Len(t, before, 3)

	// A's scope has none of them; its Cleanup, and a collection of A's
	// garbage (which calls it), leave them all.
	cleaner, ok := a.sn.(snapshots.Cleaner)
	require.True(t, ok)
	require.NoError(t, cleaner.Cleanup(ctx))
	_, err = a.meta.Prepare(ctx, "a-scratch", "")
	require.NoError(t, err)
	require.NoError(t, a.meta.Remove(ctx, "a-scratch"))
	_, err = a.db.GarbageCollect(ctx)
	require.NoError(t, err)
	assert.Equal(t, before, snapshotDirNames(t, root))
	assert.Empty(t, backend(t, a))
}
