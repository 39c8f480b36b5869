package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/log"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/examples/nativesnap"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// doctorFiles is a snapshotter's store, containerd's meta.db and the
// driver's root that containerd's own metadata layer wrote together.
type doctorFiles struct {
	store, metaDB, root string
}

// snapshotsDir is where the driver keeps snapshot directories.
func (f doctorFiles) snapshotsDir() string { return filepath.Join(f.root, "snapshots") }

// args are doctor's arguments for all three.
func (f doctorFiles) args(extra ...string) []string {
	return append([]string{"doctor", f.store, "--containerd-db", f.metaDB, "--snapshotter", "native", "--root", f.root}, extra...)
}

// doctorFixture builds, through containerd's metadata package over
// nativesnap on a bbolt store, an image chain, a container and a view in
// namespace "default" and a snapshot in "k8s.io"; everything agrees.
func doctorFixture(t *testing.T) doctorFiles {
	t.Helper()
	dir := t.TempDir()
	f := doctorFiles{store: filepath.Join(dir, "metadata.db"), metaDB: filepath.Join(dir, "meta.db"), root: filepath.Join(dir, "native")}
	ms, err := storage.NewBoltMetaStore(f.store)
	require.NoError(t, err)
	writeThroughContainerd(t, f, ms)
	return f
}

// writeThroughContainerd makes doctorFixture's snapshots in ms, f.root and
// f.metaDB with containerd's metadata layer, as containerd would, and
// closes ms.
func writeThroughContainerd(t *testing.T, f doctorFiles, ms storage.MetaStore) {
	t.Helper()
	// containerd's content store warns, once per store, that the file
	// system lacks fsverity.
	require.NoError(t, log.SetLevel("error"))
	sn, err := nativesnap.New(f.root, ms)
	require.NoError(t, err)
	bdb, err := bolt.Open(f.metaDB, 0o600, nil)
	require.NoError(t, err)
	cs, err := local.NewStore(filepath.Join(filepath.Dir(f.metaDB), "content"))
	require.NoError(t, err)
	mdb := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{"native": sn})
	require.NoError(t, mdb.Init(context.Background()))
	s := mdb.Snapshotter("native")

	ctx := namespaces.WithNamespace(context.Background(), "default")
	_, err = s.Prepare(ctx, "layer-1-active", "")
	require.NoError(t, err)
	require.NoError(t, s.Commit(ctx, "layer-1", "layer-1-active"))
	_, err = s.Prepare(ctx, "layer-2-active", "layer-1")
	require.NoError(t, err)
	require.NoError(t, s.Commit(ctx, "layer-2", "layer-2-active"))
	_, err = s.Prepare(ctx, "container", "layer-2")
	require.NoError(t, err)
	_, err = s.View(ctx, "view", "layer-2")
	require.NoError(t, err)
	_, err = s.Prepare(namespaces.WithNamespace(context.Background(), "k8s.io"), "pod", "")
	require.NoError(t, err)

	require.NoError(t, s.Close()) // closes nativesnap, and so ms
	require.NoError(t, bdb.Close())
}

// backend finds the snapshot of the store named key, or whose name
// (containerd's namespace/N/key) ends in /key.
func (f doctorFiles) backend(t *testing.T, key string) storage.Record {
	t.Helper()
	var found []storage.Record
	f.withStore(t, func(ctx context.Context) error {
		return storage.Walk(ctx, func(r storage.Record) error {
			if r.Name == key || strings.HasSuffix(r.Name, "/"+key) {
				found = append(found, r)
			}
			return nil
		})
	})
	require.Len(t, found, 1, "snapshots named */%s", key)
	return found[0]
}

// withStore runs fn in a writable transaction of the store.
func (f doctorFiles) withStore(t *testing.T, fn func(ctx context.Context) error) {
	t.Helper()
	ms, err := storage.NewBoltMetaStore(f.store)
	require.NoError(t, err)
	defer func() { require.NoError(t, ms.Close()) }()
	require.NoError(t, ms.WithTransaction(context.Background(), true, fn))
}

// doctorJSON runs doctor --json and decodes what it writes.
func doctorJSON(t *testing.T, args ...string) (doctorReport, result) {
	t.Helper()
	r := exe(t, append(args, "--json")...)
	var rep doctorReport
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rep), "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	return rep, r
}

// TestDoctorFindsEachDisagreement: each way the store, containerd's
// meta.db and the directories can disagree is found, and only it.
func TestDoctorFindsEachDisagreement(t *testing.T) {
	for _, tc := range []struct {
		name string
		// damage changes the files and returns what doctor must find.
		damage func(t *testing.T, f doctorFiles) []finding
	}{
		{"a snapshot removed from the store behind containerd's back", func(t *testing.T, f doctorFiles) []finding {
			view := f.backend(t, "view") // a view of a parent has no directory
			f.withStore(t, func(ctx context.Context) error {
				_, _, err := storage.Remove(ctx, view.Name)
				return err
			})
			return []finding{{Kind: findMissingFromStore, Snapshot: view.Name, Namespace: "default", Key: "view"}}
		}},
		{"a snapshot containerd does not know", func(t *testing.T, f doctorFiles) []finding {
			ms, err := storage.NewBoltMetaStore(f.store)
			require.NoError(t, err)
			sn, err := nativesnap.New(f.root, ms)
			require.NoError(t, err)
			_, err = sn.Prepare(context.Background(), "stray", "")
			require.NoError(t, err)
			require.NoError(t, ms.Close())
			stray := f.backend(t, "stray")
			return []finding{{Kind: findUnreferenced, Snapshot: "stray", ID: stray.ID, SnapshotKind: "active"}}
		}},
		{"a directory with no snapshot", func(t *testing.T, f doctorFiles) []finding {
			path := filepath.Join(f.snapshotsDir(), "999")
			require.NoError(t, os.Mkdir(path, 0o700))
			return []finding{{Kind: findOrphanDirectory, ID: "999", Path: path}}
		}},
		{"a snapshot whose directory is gone", func(t *testing.T, f doctorFiles) []finding {
			c := f.backend(t, "container")
			path := filepath.Join(f.snapshotsDir(), c.ID)
			require.DirExists(t, path)
			require.NoError(t, os.RemoveAll(path))
			return []finding{{Kind: findMissingDirectory, Snapshot: c.Name, ID: c.ID, SnapshotKind: "active", Path: path}}
		}},
		{"a temporary directory a crashed copy left", func(t *testing.T, f doctorFiles) []finding {
			path := filepath.Join(f.snapshotsDir(), "new-2718281828")
			require.NoError(t, os.Mkdir(path, 0o700))
			return []finding{{Kind: findLeftoverDirectory, Path: path}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := doctorFixture(t)
			want := tc.damage(t, f)
			rep, r := doctorJSON(t, f.args()...)
			assert.Equal(t, 1, r.code, "stderr: %s", r.stderr)
			assert.Equal(t, "snapmeta: 1 disagreement(s) found\n", r.stderr)
			assert.False(t, rep.OK)
			assert.Equal(t, want, rep.Findings)
		})
	}
}

// TestDoctorAllAtOnce: every kind at once, in report order, in the table
// and in JSON.
func TestDoctorAllAtOnce(t *testing.T) {
	f := doctorFixture(t)
	view, container := f.backend(t, "view"), f.backend(t, "container")
	f.withStore(t, func(ctx context.Context) error {
		if _, _, err := storage.Remove(ctx, view.Name); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "stray", "")
		return err
	})
	stray := f.backend(t, "stray")
	require.NoError(t, os.RemoveAll(filepath.Join(f.snapshotsDir(), container.ID)))
	require.NoError(t, os.Mkdir(filepath.Join(f.snapshotsDir(), "999"), 0o700))
	require.NoError(t, os.Mkdir(filepath.Join(f.snapshotsDir(), "new-1"), 0o700))
	require.NoError(t, os.Mkdir(filepath.Join(f.snapshotsDir(), "rm-7"), 0o700))

	rep, r := doctorJSON(t, f.args()...)
	assert.Equal(t, 1, r.code)
	var kinds []string
	for _, x := range rep.Findings {
		kinds = append(kinds, x.Kind+" "+x.Snapshot+x.Path)
	}
	sd := f.snapshotsDir()
	assert.Equal(t, []string{
		"unreferenced stray",
		"missing_from_store " + view.Name,
		"orphan_directory " + filepath.Join(sd, "999"),
		"missing_directory " + container.Name + filepath.Join(sd, container.ID),
		"missing_directory stray" + filepath.Join(sd, stray.ID),
		"leftover_directory " + filepath.Join(sd, "new-1"),
		"leftover_directory " + filepath.Join(sd, "rm-7"),
	}, kinds)
	require.NotNil(t, rep.References)
	assert.Equal(t, 5, *rep.References, "four in default, one in k8s.io")
	assert.Equal(t, 5, rep.Snapshots)

	r = exe(t, f.args()...)
	assert.Equal(t, 1, r.code)
	assert.Equal(t, "snapmeta: 7 disagreement(s) found\n", r.stderr)
	for _, want := range []string{
		"snapshots containerd does not refer to (its garbage collector will remove them): 1\n",
		"references containerd holds to snapshots the store lacks: 1\n",
		"directories with no snapshot: 1\n",
		"snapshots with no directory: 2\n",
		"leftover temporary directories (not snapshot IDs): 2\n",
		"  default    view  " + view.Name + "\n",
	} {
		assert.Contains(t, r.stdout, want)
	}
}

// TestDoctorCleanExitsZero: files containerd's metadata layer wrote
// agree, in both output forms, and each half of the comparison runs alone.
func TestDoctorCleanExitsZero(t *testing.T) {
	f := doctorFixture(t)
	out := ok(t, f.args()...)
	assert.Contains(t, out, "(5 snapshots)")
	assert.Contains(t, out, `snapshotter "native" (5 references)`)
	assert.True(t, strings.HasSuffix(out, "\nok: they agree\n"), out)

	rep, r := doctorJSON(t, f.args()...)
	assert.Equal(t, 0, r.code)
	assert.True(t, rep.OK)
	assert.Equal(t, []finding{}, rep.Findings)

	ok(t, "doctor", f.store, "--root", f.root)
	ok(t, "doctor", "--store", f.store, "--containerd-db", f.metaDB, "--snapshotter", "native")
}

// TestDoctorLostReferenceUnderAKeptOne: a snapshot whose own reference is
// gone but whose child containerd still refers to is reported as
// unreferenced, with the note that the collector will fail to remove it.
func TestDoctorLostReferenceUnderAKeptOne(t *testing.T) {
	f := doctorFixture(t)
	layer1, layer2 := f.backend(t, "layer-1"), f.backend(t, "layer-2")
	db, err := bolt.Open(f.metaDB, 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("v1")).Bucket([]byte("default")).Bucket([]byte("snapshots")).Bucket([]byte("native")).DeleteBucket([]byte("layer-1"))
	}))
	require.NoError(t, db.Close())

	rep, r := doctorJSON(t, f.args()...)
	assert.Equal(t, 1, r.code)
	assert.Equal(t, []finding{{
		Kind: findUnreferenced, Snapshot: layer1.Name, ID: layer1.ID, SnapshotKind: "committed",
		Detail: `the garbage collector will fail to remove it: "` + layer2.Name + `", which containerd refers to, descends from it`,
	}}, rep.Findings)
}

// TestDoctorUsageErrors: flags that do not go together, paths that do not
// exist and a database that is not containerd's exit 2 with one line.
func TestDoctorUsageErrors(t *testing.T) {
	f := doctorFixture(t)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"nothing to compare with", []string{"doctor", f.store}, "doctor needs --containerd-db and --snapshotter, or --root, or both"},
		{"a database without the snapshotter's name", []string{"doctor", f.store, "--containerd-db", f.metaDB}, "--containerd-db needs --snapshotter"},
		{"a snapshotter's name without a database", []string{"doctor", f.store, "--root", f.root, "--snapshotter", "native"}, "--snapshotter is the snapshotter's name in --containerd-db, which is not given"},
		{"a database that does not exist", []string{"doctor", f.store, "--containerd-db", f.metaDB + ".gone", "--snapshotter", "native"}, "meta.db.gone: no such file or directory"},
		{"a root that does not exist", []string{"doctor", f.store, "--root", f.root + ".gone"}, "native.gone: no such file or directory"},
		{"the snapshots directory given as the root", []string{"doctor", f.store, "--root", f.snapshotsDir()}, "holds no snapshots/ directory: --root is the driver's root, the directory that holds snapshots/; give " + f.root + " instead"},
		{"a snapshotter containerd does not know", []string{"doctor", f.store, "--containerd-db", f.metaDB, "--snapshotter", "overlayfs"}, `has no snapshot of snapshotter "overlayfs" in any namespace; it has snapshots of native`},
		{"the snapshotter's store given as containerd's", []string{"doctor", f.store, "--containerd-db", f.store, "--snapshotter", "native"}, "is not containerd's metadata database (it is a snapshotter's store)"},
		{"a store that does not exist", []string{"doctor", f.store + ".gone", "--root", f.root}, "does not exist"},
		{"a lock timeout of zero", []string{"doctor", f.store, "--containerd-db", f.metaDB, "--snapshotter", "native", "--lock-timeout", "0s"}, "--lock-timeout must be positive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := exe(t, tc.args...)
			wantFail(t, r, 2, tc.want)
			assert.Empty(t, r.stdout)
		})
	}
}

// TestDoctorLockedDatabase: while another process holds containerd's
// database (as a running containerd does), doctor gives up after
// --lock-timeout and says what to do, rather than wait.
func TestDoctorLockedDatabase(t *testing.T) {
	f := doctorFixture(t)
	db, err := bolt.Open(f.metaDB, 0o600, nil) // an exclusive lock
	require.NoError(t, err)
	defer db.Close()
	r := exe(t, f.args("--lock-timeout", "200ms")...)
	wantFail(t, r, 2, "containerd's database "+f.metaDB+" is locked: a running containerd holds it (waited 200ms); stop containerd, or copy the file")
}

// TestDoctorFlagsFromEnvironment: doctor's flags, like every command's,
// may be set as SNAPMETA_ variables.
func TestDoctorFlagsFromEnvironment(t *testing.T) {
	f := doctorFixture(t)
	require.NoError(t, os.Mkdir(filepath.Join(f.snapshotsDir(), "999"), 0o700))
	r := snapmeta(t, "", []string{
		"SNAPMETA_STORE=" + f.store, "SNAPMETA_CONTAINERD_DB=" + f.metaDB,
		"SNAPMETA_SNAPSHOTTER=native", "SNAPMETA_ROOT=" + f.root, "SNAPMETA_JSON=true",
	}, "doctor")
	assert.Equal(t, 1, r.code, "stderr: %s", r.stderr)
	var rep doctorReport
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rep))
	assert.Equal(t, []finding{{Kind: findOrphanDirectory, ID: "999", Path: filepath.Join(f.snapshotsDir(), "999")}}, rep.Findings)
	assert.Equal(t, f.metaDB, rep.ContainerdDB)
}

// TestDoctorRefusesUnreadableRecords: a record that cannot be read hides
// its ID, so doctor refuses the store rather than call its directory an
// orphan.
func TestDoctorRefusesUnreadableRecords(t *testing.T) {
	f := doctorFixture(t)
	c := f.backend(t, "container")
	damageBolt(t, f.store, func(snaps *bolt.Bucket) error {
		return snaps.Bucket([]byte(c.Name)).Put([]byte(storage.KeyKind), []byte{9, 9})
	})
	r := exe(t, f.args()...)
	wantFail(t, r, 2, "the store has 1 snapshot(s) that cannot be read; doctor compares only a store it can read whole (see 'snapmeta check' and 'snapmeta salvage')")
	assert.Empty(t, r.stdout)
}

// TestDoctorOnEtcd: doctor reads a store on etcd as it reads a bbolt file.
func TestDoctorOnEtcd(t *testing.T) {
	c := etcdtest.Start(t)
	dir := t.TempDir()
	addr, ms := etcdStore(t, c, "doctor")
	f := doctorFiles{store: addr, metaDB: filepath.Join(dir, "meta.db"), root: filepath.Join(dir, "native")}
	writeThroughContainerd(t, f, ms)
	out := ok(t, f.args()...)
	assert.Contains(t, out, "(5 snapshots)")

	_, ms = etcdStore(t, c, "doctor") // writeThroughContainerd closed it
	var containerID string
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		return storage.Walk(ctx, func(r storage.Record) error {
			if r.Name == "default/5/container" {
				containerID = r.ID
			}
			return nil
		})
	}))
	require.NotEmpty(t, containerID)
	require.NoError(t, os.RemoveAll(filepath.Join(f.snapshotsDir(), containerID)))
	rep, r := doctorJSON(t, f.args()...)
	assert.Equal(t, 1, r.code)
	assert.Equal(t, []finding{{
		Kind: findMissingDirectory, Snapshot: "default/5/container", ID: containerID, SnapshotKind: "active",
		Path: filepath.Join(f.snapshotsDir(), containerID),
	}}, rep.Findings)
}
