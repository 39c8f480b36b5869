package testsuite

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

const (
	concurrentWriters    = 16
	concurrentIterations = 20
	concurrentReaders    = 2
)

// layerResult is what a writer learned about one layer it committed.
type layerResult struct {
	name    string
	id      string
	size    int64
	removed bool
}

// testConcurrency: writers racing through WithTransaction on one shared
// committed parent leave a consistent store, and readers never see an
// inconsistent one.
func testConcurrency(t *testing.T, open Opener) {
	ms, _ := openStore(t, open)
	var baseID string
	inWrite(t, ms, func(ctx context.Context) {
		baseID = mustLayer(t, ctx, "base", "", snapshots.Usage{Size: 1})
	})

	var (
		mu      sync.Mutex
		results []layerResult
		writers sync.WaitGroup
		readers sync.WaitGroup
		done    = make(chan struct{})
	)
	ctx := context.Background()

	for g := range concurrentWriters {
		writers.Go(func() {
			for i := range concurrentIterations {
				name := fmt.Sprintf("layer-%02d-%02d", g, i)
				size := int64(g*1000 + i)
				var id string
				attempt := 0
				// A retried callback starts from a clean transaction; it uses
				// a fresh active key per attempt so that it never depends on
				// what an earlier attempt did.
				err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					attempt++
					if _, _, _, err := storage.GetInfo(ctx, name); err == nil {
						return fmt.Errorf("%q exists before attempt %d committed: a failed commit left a trace", name, attempt)
					} else if !errdefs.IsNotFound(err) {
						return err
					}
					key := fmt.Sprintf("%s-active-%d", name, attempt)
					s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, "base")
					if err != nil {
						return err
					}
					if len(s.ParentIDs) != 1 || s.ParentIDs[0] != baseID {
						return fmt.Errorf("ParentIDs of %q are %v, want [%s]", key, s.ParentIDs, baseID)
					}
					cid, err := storage.CommitActive(ctx, key, name, snapshots.Usage{Size: size, Inodes: 1})
					if err != nil {
						return err
					}
					if cid != s.ID {
						return fmt.Errorf("commit of %q changed ID %s to %s", key, s.ID, cid)
					}
					id = cid
					return nil
				})
				if !assert.NoError(t, err, "writer %d iteration %d", g, i) {
					return
				}
				res := layerResult{name: name, id: id, size: size}
				if i%4 == 3 {
					err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
						rid, kind, err := storage.Remove(ctx, name)
						if err != nil {
							return err
						}
						if rid != id || kind != snapshots.KindCommitted {
							return fmt.Errorf("Remove(%q) returned %s %v, want %s committed", name, rid, kind, id)
						}
						return nil
					})
					if !assert.NoError(t, err, "writer %d removing %q", g, name) {
						return
					}
					res.removed = true
				}
				mu.Lock()
				results = append(results, res)
				mu.Unlock()
			}
		})
	}

	// Readers check, while the writers run, that every state they see is
	// consistent: each snapshot but base is committed on base, and IDMap
	// agrees with WalkInfo.
	for r := range concurrentReaders {
		readers.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				calls := 0
				err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
					calls++
					names := map[string]bool{}
					err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
						names[info.Name] = true
						if info.Name == "base" {
							return nil
						}
						if info.Parent != "base" {
							return fmt.Errorf("%q has parent %q", info.Name, info.Parent)
						}
						return nil
					})
					if err != nil {
						return err
					}
					if !names["base"] {
						return fmt.Errorf("base is missing")
					}
					ids, err := storage.IDMap(ctx)
					if err != nil {
						return err
					}
					if len(ids) != len(names) {
						return fmt.Errorf("IDMap has %d entries, WalkInfo %d snapshots", len(ids), len(names))
					}
					for id, name := range ids {
						if !names[name] {
							return fmt.Errorf("IDMap maps %s to %q, which WalkInfo did not visit", id, name)
						}
					}
					return nil
				})
				if !assert.NoError(t, err, "reader %d", r) {
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
	}

	start := time.Now()
	writers.Wait()
	close(done)
	readers.Wait()
	t.Logf("%d writers x %d iterations took %v", concurrentWriters, concurrentIterations, time.Since(start))
	require.False(t, t.Failed(), "a writer or reader failed")
	require.Len(t, results, concurrentWriters*concurrentIterations)

	run(t, "every committed layer is there with its ID and usage", func(t *testing.T) {
		inRead(t, ms, func(ctx context.Context) {
			want := []string{"base"}
			for _, r := range results {
				if r.removed {
					_, _, _, err := storage.GetInfo(ctx, r.name)
					assertClass(t, err, notFound, "removed layer %q", r.name)
					continue
				}
				want = append(want, r.name)
				id, info, usage := mustGetInfo(t, ctx, r.name)
				assert.Equal(t, r.id, id, "ID of %q", r.name)
				assert.Equal(t, snapshots.KindCommitted, info.Kind, "kind of %q", r.name)
				assert.Equal(t, "base", info.Parent, "parent of %q", r.name)
				assert.Equal(t, snapshots.Usage{Size: r.size, Inodes: 1}, usage, "usage of %q", r.name)
			}
			got, err := walkNames(ctx)
			require.NoError(t, err)
			assert.Equal(t, sorted(want), got, "WalkInfo after the race")
		})
	})

	run(t, "IDs are unique and IDMap matches WalkInfo", func(t *testing.T) {
		seen := map[string]string{baseID: "base"}
		for _, r := range results {
			if other, dup := seen[r.id]; dup {
				t.Errorf("%q and %q were given the same ID %s", r.name, other, r.id)
			}
			seen[r.id] = r.name
		}
		inRead(t, ms, func(ctx context.Context) {
			ids, err := storage.IDMap(ctx)
			require.NoError(t, err)
			names, err := walkNames(ctx)
			require.NoError(t, err)
			assert.Len(t, ids, len(names), "IDMap and WalkInfo disagree on the number of snapshots")
			for id, name := range ids {
				assert.Equal(t, seen[id], name, "IDMap entry %s", id)
			}
		})
	})

	run(t, "the shared parent cannot be removed until its children are", func(t *testing.T) {
		refusal(t, ms, failedPrecondition, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "base")
			return err
		})
		var left []string
		for _, r := range results {
			if !r.removed {
				left = append(left, r.name)
			}
		}
		// Small batches keep every transaction within any engine's limits.
		for batch := range slices.Chunk(left, 16) {
			inWrite(t, ms, func(ctx context.Context) {
				for _, name := range batch {
					mustRemove(t, ctx, name)
				}
			})
		}
		inWrite(t, ms, func(ctx context.Context) {
			id, kind := mustRemove(t, ctx, "base")
			assert.Equal(t, baseID, id)
			assert.Equal(t, snapshots.KindCommitted, kind)
		})
		assert.Empty(t, dump(t, ms).Snapshots)
	})
}
