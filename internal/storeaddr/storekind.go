package storeaddr

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/snapmeta/storage"
	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// snapshotterStores is where containerd's snapshotters keep their stores.
const snapshotterStores = "/var/lib/containerd/io.containerd.snapshotter.v1.<name>/metadata.db"

// boltLayoutProblem says why the bbolt file at path is not a snapshotter's
// store, nil when it is one (or may be: damage inside the layout is check's
// business) or when the file cannot be opened here (the store's own open
// then says why). Without it, any bbolt file reads as a store without
// snapshots.
func boltLayoutProblem(path string) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: BoltLockTimeout})
	if err != nil {
		return nil
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) error {
		var top []string
		_ = tx.ForEach(func(name []byte, _ *bolt.Bucket) error {
			top = append(top, strconv.Quote(string(name)))
			return nil
		})
		v := tx.Bucket([]byte(storage.KeyVersion))
		if v == nil {
			if len(top) == 0 {
				// containerd's store creates its buckets at the first
				// write: an empty file is a store without snapshots.
				return nil
			}
			return fmt.Errorf("%s is not a snapshotter's store: its top-level buckets are %s, a snapshotter's is %q (snapshotter stores are usually %s)",
				path, strings.Join(top, ", "), storage.KeyVersion, snapshotterStores)
		}
		if v.Get([]byte(storage.KeySnapshots)) != nil || v.Bucket([]byte(storage.KeySnapshots)) != nil ||
			v.Get([]byte(storage.KeyParents)) != nil || v.Bucket([]byte(storage.KeyParents)) != nil {
			return nil
		}
		var inside []string
		containerdMeta := v.Get([]byte("version")) != nil
		_ = v.ForEach(func(k, val []byte) error {
			inside = append(inside, strconv.Quote(string(k)))
			if ns := v.Bucket(k); val == nil && ns != nil {
				for _, b := range []string{"images", "containers", "content", "leases", "snapshots"} {
					if ns.Bucket([]byte(b)) != nil {
						containerdMeta = true
					}
				}
			}
			return nil
		})
		switch {
		case len(inside) == 0:
			return nil
		case containerdMeta:
			return fmt.Errorf("%s is containerd's own metadata database (meta.db: images, containers and leases by namespace), not a snapshotter's store; snapshotter stores are usually %s",
				path, snapshotterStores)
		}
		slices.Sort(inside)
		return fmt.Errorf("%s is not a snapshotter's store: bucket %q holds %s, and no %q (snapshotter stores are usually %s)",
			path, storage.KeyVersion, strings.Join(inside, ", "), storage.KeySnapshots, snapshotterStores)
	})
}

// emptyRootError says that nothing was ever written under an etcd root that
// a command meant to read; like a missing bbolt file, it is no store. A
// store whose snapshots were all removed still holds its ID allocator, so
// it is not empty.
func emptyRootError(ctx context.Context, cli *clientv3.Client, a Address) error {
	msg := fmt.Sprintf("etcd root %q is empty: no store was ever written there (is the root right? import or migrate create a store)", a.Root)
	// A store one level down (a root of "team" for "team/snaps") is the
	// likeliest mistake: name the first key found under the root.
	resp, err := cli.Get(ctx, a.Root+"/", clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(1))
	if err == nil && len(resp.Kvs) > 0 {
		key := string(resp.Kvs[0].Key)
		if i := strings.Index(key, "/"+storage.KeyEtcdVersion+"/"); i >= 0 {
			msg += fmt.Sprintf("; a store lives at the root %q", key[:i])
		} else {
			msg += fmt.Sprintf("; other keys live under it, e.g. %q", key)
		}
	}
	return errors.New(msg)
}
