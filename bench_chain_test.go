package storage_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

// benchDeepChain is the depth of BenchmarkBoltDeepChain's chain.
const benchDeepChain = 10_000

// BenchmarkBoltDeepChain builds a chain of 10,000 layers in containerd's
// store and in ours and reports the file each ends with (file-MiB), the
// cost of GetSnapshot on top of it, and, for ours, of Check (containerd's
// store has none).
func BenchmarkBoltDeepChain(b *testing.B) {
	for _, impl := range boltImpls {
		file := filepath.Join(b.TempDir(), "metadata.db")
		withTx, closeFn, err := impl.open(file)
		require.NoError(b, err)
		s := &boltBench{boltImpl: impl, withTx: withTx}
		parent := ""
		for start := 0; start < benchDeepChain; start += 1000 {
			s.update(b, func(ctx context.Context) error {
				p := parent
				for i := start; i < start+1000; i++ {
					name := fmt.Sprintf("deep-%05d", i)
					if err := s.layer(ctx, name, p, nil); err != nil {
						return err
					}
					p = name
				}
				parent = p
				return nil
			})
		}
		s.update(b, func(ctx context.Context) error { return s.create(ctx, snapshots.KindActive, "deep-top", parent) })
		require.NoError(b, closeFn())
		st, err := os.Stat(file)
		require.NoError(b, err)
		used := boltUsedBytes(b, file)
		b.Run("impl="+impl.name+"/file", func(b *testing.B) {
			for b.Loop() {
			}
			b.ReportMetric(float64(st.Size())/(1<<20), "file-MiB")
			b.ReportMetric(float64(used)/(1<<20), "used-MiB")
		})

		withTx, closeFn, err = impl.open(file)
		require.NoError(b, err)
		s.withTx = withTx
		b.Run("impl="+impl.name+"/GetSnapshot", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				err := s.view(func(ctx context.Context) error {
					parents, err := s.getSnapshot(ctx, "deep-top")
					if err == nil && len(parents) != benchDeepChain {
						err = fmt.Errorf("%d parents", len(parents))
					}
					return err
				})
				require.NoError(b, err)
			}
		})
		require.NoError(b, closeFn())
		if impl.name == "containerd" {
			continue
		}
		ms, err := storage.NewBoltMetaStore(file)
		require.NoError(b, err)
		b.Run("impl="+impl.name+"/Check", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				problems, err := storage.Check(context.Background(), ms)
				require.NoError(b, err)
				require.Empty(b, problems)
			}
		})
		require.NoError(b, ms.Close())
	}
}

// boltUsedBytes returns the bytes of file's pages up to its high-water
// mark: bbolt grows a file by doubling (up to 16 MiB), so its size moves
// in steps that hide what the data takes.
func boltUsedBytes(b *testing.B, file string) int64 {
	db, err := bolt.Open(file, 0o600, &bolt.Options{ReadOnly: true})
	require.NoError(b, err)
	defer db.Close()
	var size int64
	require.NoError(b, db.View(func(tx *bolt.Tx) error {
		size = tx.Size()
		return nil
	}))
	return size
}
