package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/snapmeta/storage/etcdtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// chainExport is an export of n snapshots: a base layer and n-1 layers
// each the child of the one before, the costliest kind of record for an
// etcd transaction.
func chainExport(n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		parent := ""
		if i > 1 {
			parent = "l" + strconv.Itoa(i-1)
		}
		fmt.Fprintf(&b, `{"name":"l%d","id":"%d","kind":"committed","parent":%q,"labels":{},"created":"2025-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z","usage":{"size":1,"inodes":1}}`+"\n", i, i, parent)
	}
	return b.String()
}

// TestEtcdBatchBound: on etcd, --batch is bounded by what one transaction
// with etcd's default --max-txn-ops holds; at the bound each batch is one
// transaction (one revision), and above it the command is refused.
func TestEtcdBatchBound(t *testing.T) {
	c := etcdtest.Start(t)
	cli := c.Client(t)
	revision := func() int64 {
		resp, err := cli.Get(context.Background(), "probe")
		require.NoError(t, err)
		return resp.Header.Revision
	}
	const n = 3 * maxEtcdBatch
	input := chainExport(n)
	addr, ms := etcdStore(t, c, "bounded")
	require.NoError(t, ms.Close())

	before := revision()
	r := snapmeta(t, input, nil, "import", "--store", addr, "--batch", strconv.Itoa(maxEtcdBatch))
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, fmt.Sprintf("imported %d snapshots, skipped 0 identical\n", n), r.stdout)
	assert.Equal(t, int64(3), revision()-before, "one transaction per batch of %d, none split", maxEtcdBatch)
	assert.Equal(t, fmt.Sprintf("ok: %d snapshots, no problems\n", n), ok(t, "check", addr))

	bolt := filepath.Join(t.TempDir(), "big.db")
	over := strconv.Itoa(maxEtcdBatch + 1)
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
	}{
		{"import", input, []string{"import", "--store", addr, "--batch", over}},
		{"migrate", "", []string{"migrate", "--from", addr, "--to", strings.TrimSuffix(addr, "bounded") + "copy", "--batch", over}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantFail(t, snapmeta(t, tc.stdin, nil, tc.args...), 2,
				fmt.Sprintf("--batch %s is more than one etcd transaction holds: at most %d snapshots on etcd", over, maxEtcdBatch))
		})
	}
	// bbolt has no such bound.
	r = snapmeta(t, input, nil, "import", "--store", bolt, "--batch", "1000")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, ok(t, "import", "--help"), fmt.Sprintf("holds at most %d snapshots", maxEtcdBatch))
}
