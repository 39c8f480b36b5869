package hostsuite

import (
	"context"
	"os"
	"path/filepath"
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
)

// metaSnapshotter is the proxy plugin's name in the metadata layer.
const metaSnapshotter = "snapmeta"

// The layers of the scenarios: Chain2 is a layer on Chain1.
const (
	Chain1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	Chain2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

// Layer1 and Layer2 are the files of the layers Chain1 and Chain2.
var (
	Layer1 = map[string]string{"etc/one": "layer 1\n"}
	Layer2 = map[string]string{"etc/two": "layer 2\n"}
)

// Shared is what hosts share: a data directory and an etcd root.
type Shared struct {
	d        Driver
	Root     string // the data directory
	etcdRoot string
}

// Share makes a data directory and an etcd root for hosts of d to share.
func Share(t testing.TB, d Driver) *Shared {
	return &Shared{d: d, Root: t.TempDir(), etcdRoot: d.Prefix()}
}

// Host is one containerd host: its driver on its scope of the shared root,
// and containerd's metadata layer over it.
type Host struct {
	Name string
	SN   snapshots.Snapshotter // the driver
	DB   *metadata.DB
	Meta snapshots.Snapshotter // containerd's view of the driver
	MS   storage.MetaStore     // the driver's store (the driver owns it)
	d    Driver
}

// Hosts starts one host of each name on s, in order.
func (s *Shared) Hosts(t testing.TB, names ...string) []*Host {
	t.Helper()
	hosts := make([]*Host, len(names))
	for i, name := range names {
		hosts[i] = s.Host(t, name)
	}
	return hosts
}

// Host starts host name on s, in the host scope name of the etcd root.
func (s *Shared) Host(t testing.TB, name string) *Host {
	t.Helper()
	c, err := s.d.Etcd()
	require.NoError(t, err)
	cfg := c.ClientConfig()
	ms, err := storage.NewEtcdStore(s.etcdRoot, &cfg, storage.WithHost(name))
	require.NoError(t, err)
	sn, err := s.d.New(s.Root, ms)
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
	return &Host{Name: name, SN: sn, DB: db, Meta: db.Snapshotter(metaSnapshotter), MS: ms, d: s.d}
}

// Dirs lists the directories of s's data directory that snapshot IDs own.
func (s *Shared) Dirs(t testing.TB) []string {
	t.Helper()
	return s.d.SnapshotDirs(t, s.Root)
}

// Ctx is the containerd namespace of the tests.
func Ctx() context.Context {
	return namespaces.WithNamespace(context.Background(), "test")
}

// RefLabel labels a snapshot with the chain ID of the layer it is.
func RefLabel(chainID string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: chainID})
}

// extractKey is the key of h's unpack of chainID, as containerd's
// unpacker names it: one per host and layer.
func (h *Host) extractKey(chainID string) string {
	return "extract-" + h.Name + " " + chainID
}

// Unpack applies one layer as containerd's unpacker does: Prepare
// labelled with the chain ID, files written into the mount, Commit under
// the chain ID with the same label. It reports whether the layer was
// unpacked (false: the snapshotter had it, AlreadyExists).
func (h *Host) Unpack(t testing.TB, chainID, parent string, files map[string]string) bool {
	t.Helper()
	ctx := Ctx()
	key := h.extractKey(chainID)
	mounts, err := h.Meta.Prepare(ctx, key, parent, RefLabel(chainID))
	if errdefs.IsAlreadyExists(err) {
		return false
	}
	require.NoError(t, err)
	dir := h.d.WritableDir(t, mounts)
	for name, body := range files {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644))
	}
	require.NoError(t, h.Meta.Commit(ctx, chainID, key, RefLabel(chainID)))
	return true
}

// Backend returns the driver's snapshots of h: name to info.
func (h *Host) Backend(t testing.TB) map[string]snapshots.Info {
	t.Helper()
	infos := map[string]snapshots.Info{}
	require.NoError(t, h.SN.Walk(context.Background(), func(_ context.Context, i snapshots.Info) error {
		infos[i.Name] = i
		return nil
	}))
	return infos
}

// Drop removes keys from h's metadata layer, in order, and collects h's
// garbage, which removes what they held from the driver.
func (h *Host) Drop(t testing.TB, keys ...string) {
	t.Helper()
	ctx := Ctx()
	for _, k := range keys {
		require.NoError(t, h.Meta.Remove(ctx, k), "host %s removes %s", h.Name, k)
	}
	_, err := h.DB.GarbageCollect(ctx)
	require.NoError(t, err)
}

// Prepare prepares the active key on parent in h's metadata layer, as a
// container's, and returns its mounts.
func (h *Host) Prepare(t testing.TB, key, parent string) []mount.Mount {
	t.Helper()
	mounts, err := h.Meta.Prepare(Ctx(), key, parent)
	require.NoError(t, err, "host %s prepares %s", h.Name, key)
	return mounts
}

// RequireCheckClean runs storage.Check on ms and expects no problem.
func RequireCheckClean(t testing.TB, ms storage.MetaStore) {
	t.Helper()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Empty(t, problems, "storage.Check")
}

// ListDir lists the names in dir.
func ListDir(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
