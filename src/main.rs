fn main() {
    println!("prefix-tune: under construction");
}
