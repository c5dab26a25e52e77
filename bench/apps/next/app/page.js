import { headers } from 'next/headers';

// Rendered on every request: a product list of some weight.
export const dynamic = 'force-dynamic';

function products(seed) {
  const list = [];
  for (let i = 0; i < 100; i++) {
    const n = (seed * 31 + i * 7919) % 10007;
    list.push({ id: i, name: `Product ${i}`, price: (n % 9000) / 100 + 1, stock: n % 17 });
  }
  return list;
}

export default async function Home() {
  const h = await headers();
  const seed = Number(h.get('x-seed')) || 1;
  const items = products(seed);
  const total = items.reduce((s, p) => s + p.price, 0);
  return (
    <main>
      <h1>Products</h1>
      <p id="pid" data-pid={process.pid}>served by {process.pid}</p>
      <p>{items.length} products, total {total.toFixed(2)}</p>
      <ul>
        {items.map((p) => (
          <li key={p.id}>
            {p.name}: ${p.price.toFixed(2)} ({p.stock} in stock)
          </li>
        ))}
      </ul>
    </main>
  );
}
