package storage_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/snapmeta/storage"
)

// prepare is how a driver's Prepare uses the store: create the snapshot in a
// writable transaction, make its directory, and commit; on any failure the
// transaction is rolled back and the directory removed.
func prepare(ctx context.Context, ms storage.MetaStore, root, key, parent string) (storage.Snapshot, error) {
	ctx, t, err := ms.TransactionContext(ctx, true)
	if err != nil {
		return storage.Snapshot{}, err
	}
	s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent)
	if err != nil {
		_ = t.Rollback()
		return storage.Snapshot{}, err
	}
	dir := filepath.Join(root, "snapshots", s.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		_ = t.Rollback()
		return storage.Snapshot{}, err
	}
	if err := t.Commit(); err != nil {
		_ = os.RemoveAll(dir)
		return storage.Snapshot{}, err
	}
	return s, nil
}

// Example shows a driver preparing a layer, committing it, and preparing a
// container snapshot on top of it.
func Example() {
	root, _ := os.MkdirTemp("", "snapmeta-example")
	defer os.RemoveAll(root)

	ms, err := storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ms.Close()
	ctx := context.Background()

	layer, _ := prepare(ctx, ms, root, "extract-layer", "")
	err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, "extract-layer", "layer-1", snapshots.Usage{Size: 4096, Inodes: 3})
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	container, err := prepare(ctx, ms, root, "container", "layer-1")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("layer ID:", layer.ID)
	fmt.Println("container ID:", container.ID, "parents:", container.ParentIDs)
	// Output:
	// layer ID: 1
	// container ID: 2 parents: [1]
}
