package storage_test

import (
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// This file runs the linearizability workload of linearizability_test.go
// on host scopes (issue 13): within one scope the containerd model holds as
// it does on a root without scopes, and two scopes of one root, worked on
// at once over the same names, are each linearizable on their own, so
// neither sees the other.

// linHostClients opens n clients of host's scope of root: the host's own
// store (holding its lease) and n-1 operator views of the same scope, each
// with a client and an ID allocator of its own; every other one walks in
// pages of 2, every other view writes by hand half the time.
func linHostClients(t *testing.T, root, host string, n int) []linClient {
	t.Helper()
	c := etcdServer(t)
	clients := make([]linClient, n)
	for i := range clients {
		cfg := c.ClientConfig()
		opts := []storage.EtcdOpt{storage.WithRequestTimeout(5 * time.Second), storage.WithHostView(host)}
		if i == 0 {
			opts[1] = storage.WithHost(host)
		}
		if i%2 == 1 {
			opts = append(opts, storage.WithPageSize(2))
		}
		ms, err := storage.NewEtcdStore(root, &cfg, opts...)
		require.NoError(t, err)
		t.Cleanup(func() { _ = ms.Close() })
		clients[i] = linClient{ms: ms, manual: i%2 == 0 && i > 0}
	}
	return clients
}

func TestLinearizabilityEtcdHostScope(t *testing.T) {
	seed := linSeed(t)
	root := uniqueRoot(t)
	clients := linHostClients(t, root, "h", 5)
	history, stats := linWorkload(t, seed, clients, 150, 10*time.Second, nil)
	t.Log(stats)
	linCheckStore(t, clients[0].ms)
	linAssertLinearizable(t, history)
}

// TestLinearizabilityEtcdTwoHostScopesDoNotInterfere runs one workload on
// two hosts of one root at once, over the same names, and checks each
// host's history on its own: were a write of one scope seen by the other,
// the other's history would not be linearizable against an empty start.
func TestLinearizabilityEtcdTwoHostScopesDoNotInterfere(t *testing.T) {
	seed := linSeed(t)
	root := uniqueRoot(t)
	const perHost = 3
	clients := append(linHostClients(t, root, "a", perHost), linHostClients(t, root, "b", perHost)...)
	history, stats := linWorkload(t, seed, clients, 120, 10*time.Second, nil)
	t.Log(stats)
	linCheckStore(t, clients[0].ms)
	var ofA, ofB []porcupine.Operation
	for _, op := range history {
		if op.ClientId < perHost {
			ofA = append(ofA, op)
		} else {
			ofB = append(ofB, op)
		}
	}
	t.Run("a", func(t *testing.T) { linAssertLinearizable(t, ofA) })
	t.Run("b", func(t *testing.T) { linAssertLinearizable(t, ofB) })
	// Control: the two histories together, as if of one store, are not
	// linearizable (both scopes created the same names independently).
	// porcupine may not decide; only a pass would be wrong.
	res := porcupine.CheckOperationsTimeout(linModel, history, 10*time.Second)
	t.Logf("both histories as one store: %s", res)
	require.NotEqual(t, porcupine.Ok, res, "two independent scopes over the same names look like one store: the check cannot tell scopes apart")
}
