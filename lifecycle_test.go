package storage_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// lcEngines opens a store on each engine, and again at the same place once
// the first is closed.
var lcEngines = []struct {
	name string
	open func(t *testing.T) (ms storage.MetaStore, reopen func() storage.MetaStore)
}{
	{"bolt", func(t *testing.T) (storage.MetaStore, func() storage.MetaStore) {
		dir := t.TempDir()
		return openBolt(t, dir), func() storage.MetaStore { return openBolt(t, dir) }
	}},
	{"etcd", func(t *testing.T) (storage.MetaStore, func() storage.MetaStore) {
		root := uniqueRoot(t)
		return openEtcd(t, root), func() storage.MetaStore { return openEtcd(t, root) }
	}},
}

// idMap reads the store's IDMap in a transaction of its own.
func idMap(ms storage.MetaStore) (ids map[string]string, err error) {
	err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		ids, err = storage.IDMap(ctx)
		return err
	})
	return ids, err
}

// lcNames lists the snapshot names of ms.
func lcNames(t *testing.T, ms storage.MetaStore) []string {
	t.Helper()
	ids, err := idMap(ms)
	require.NoError(t, err)
	var names []string
	for _, name := range ids {
		names = append(names, name)
	}
	return names
}

// TestCallbackThatExitsItsGoroutineEndsItsTransaction: a callback that
// calls runtime.Goexit outside a group commit (read-only, or any on etcd)
// leaves no transaction open: a leaked bbolt reader would block a writer
// that grows the file, and Close.
func TestCallbackThatExitsItsGoroutineEndsItsTransaction(t *testing.T) {
	for _, eng := range lcEngines {
		for _, writable := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/writable=%v", eng.name, writable), func(t *testing.T) {
				ms, _ := eng.open(t)
				exited := make(chan struct{})
				go func() {
					defer close(exited)
					_ = ms.WithTransaction(context.Background(), writable, func(ctx context.Context) error {
						if writable {
							if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "exiter", ""); err != nil {
								return err
							}
						}
						runtime.Goexit()
						return nil
					})
					t.Error("WithTransaction returned to a callback that called runtime.Goexit")
				}()
				<-exited

				// Enough labels that the file, and bbolt's map of it, grows.
				big := map[string]string{"fill": strings.Repeat("x", 4000)}
				within(t, hangBound, "writes that grow the file", func() {
					for i := range 64 {
						assert.NoError(t, ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
							_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprint("grow-", i), "", snapshots.WithLabels(big))
							return err
						}))
					}
				})
				assert.NotContains(t, lcNames(t, ms), "exiter")
				within(t, hangBound, "Close", func() { assert.NoError(t, ms.Close()) })
			})
		}
	}
}
