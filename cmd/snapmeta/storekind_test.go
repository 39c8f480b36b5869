package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapmeta/storage/etcdtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// boltFile writes a bbolt file whose buckets fn makes.
func boltFile(t *testing.T, fn func(tx *bolt.Tx) error) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "some.db")
	db, err := bolt.Open(path, 0o600, nil)
	require.NoError(t, err)
	err = db.Update(fn)
	require.NoError(t, db.Close())
	require.NoError(t, err)
	return path
}

// TestWrongFile: a bbolt file that is not a snapshotter's store is said to
// be so, by every command, and never written to.
func TestWrongFile(t *testing.T) {
	metaDB := boltFile(t, func(tx *bolt.Tx) error {
		// containerd's meta.db: v1/version, v1/<namespace>/{images,snapshots/<snapshotter>,...}
		v, err := tx.CreateBucket([]byte("v1"))
		if err != nil {
			return err
		}
		if err := v.Put([]byte("version"), []byte{3}); err != nil {
			return err
		}
		ns, err := v.CreateBucket([]byte("default"))
		if err != nil {
			return err
		}
		if _, err := ns.CreateBucket([]byte("images")); err != nil {
			return err
		}
		_, err = ns.CreateBucketIfNotExists([]byte("snapshots"))
		return err
	})
	other := boltFile(t, func(tx *bolt.Tx) error {
		_, err := tx.CreateBucket([]byte("settings"))
		return err
	})
	const whereStores = "snapshotter stores are usually /var/lib/containerd/io.containerd.snapshotter.v1.<name>/metadata.db"
	for _, tc := range []struct {
		name, path, want string
	}{
		{"containerd meta.db", metaDB, "is containerd's own metadata database (meta.db: images, containers and leases by namespace), not a snapshotter's store; " + whereStores},
		{"other", other, `is not a snapshotter's store: its top-level buckets are "settings", a snapshotter's is "v1" (` + whereStores + ")"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := fileSum(t, tc.path)
			for _, cmd := range []string{"ls", "tree", "export", "ids"} {
				wantFail(t, exe(t, cmd, "--store", tc.path), 1, tc.path+" "+tc.want)
			}
			wantFail(t, exe(t, "check", "--store", tc.path), 2, tc.want)
			wantFail(t, snapmeta(t, ok(t, "export", "--store", boltFixture(t)), nil, "import", "--store", tc.path), 1, tc.want)
			assert.Equal(t, before, fileSum(t, tc.path), "the file is unchanged")
		})
	}
	// A bbolt file without buckets is a store no snapshot was written to
	// yet (containerd creates the buckets at the first write).
	empty := boltFile(t, func(*bolt.Tx) error { return nil })
	assert.Equal(t, "ok: 0 snapshots, no problems\n", ok(t, "check", "--store", empty))
}

// TestEmptyEtcdRoot: a root that holds nothing is no store for the read
// commands, and is where import creates one.
func TestEmptyEtcdRoot(t *testing.T) {
	c := etcdtest.Start(t)
	addr, ms := etcdStore(t, c, "team/snaps")
	fixture(t, ms)
	base := strings.TrimSuffix(addr, "team/snaps")
	const empty = `etcd root "nothing" is empty: no store was ever written there (is the root right? import or migrate create a store)`
	for _, cmd := range []string{"ls", "tree", "export", "ids"} {
		wantFail(t, exe(t, cmd, "--store", base+"nothing"), 1, empty)
	}
	wantFail(t, exe(t, "check", "--store", base+"nothing"), 2, empty)
	wantFail(t, exe(t, "ls", "--store", base+"team"), 1, `etcd root "team" is empty: no store was ever written there (is the root right? import or migrate create a store); a store lives at the root "team/snaps"`)

	snapmetaOK(t, ok(t, "export", "--store", addr), "import", "--store", base+"copy")
	assert.Equal(t, "ok: 7 snapshots, no problems\n", ok(t, "check", "--store", base+"copy"))
}
